// cpvm's console recording player: an FBS 001.000 file replayed through stock noVNC's RFB
// client, which decodes and draws it exactly as it drew the live session.
//
// The page is opened as play#ticket=T: the fragment never reaches a server or a log. The
// recording is fetched once (the ticket works once) and kept in memory; playing feeds its
// blocks to noVNC at their timestamps through a fake WebSocket that ignores what noVNC
// sends. RFB cannot go back, so seeking backwards starts a fresh client and feeds it
// everything before the target at once; seeking forwards feeds the gap at once.
import RFB from "../resource/noVNC/core/rfb.js";

const $ = (id) => document.getElementById(id);
const FEED_CHUNK = 1 << 20; // noVNC's receive queue grows to 40 MiB at most

export function parseFbs(buffer) {
    const bytes = new Uint8Array(buffer);
    const header = new TextDecoder().decode(bytes.subarray(0, 12));
    if (header !== "FBS 001.000\n") {
        throw new Error("not an FBS 001.000 recording");
    }
    const view = new DataView(buffer);
    const blocks = [];
    let i = 12;
    while (i + 4 <= bytes.length) {
        const length = view.getUint32(i);
        const end = i + 4 + Math.ceil(length / 4) * 4 + 4;
        if (end > bytes.length) {
            break; // a recording cut short (disk full): play what is whole
        }
        blocks.push({ t: view.getUint32(end - 4), data: bytes.subarray(i + 4, i + 4 + length) });
        i = end;
    }
    return blocks;
}

// noVNC takes one handshake step per message it receives: a version, security type and
// ServerInit arriving together would leave the later steps (and the first updates) unread
// until more data came. Split the handshake into its messages (RFB 3.3, security None or
// VNC Authentication as FBS tools record it), each fed on its own.
export function splitHandshake(blocks) {
    const first = [];
    let n = 0;
    let k = 0;
    while (k < blocks.length && n < 1 << 16) {
        first.push(blocks[k]);
        n += blocks[k++].data.length;
    }
    const bytes = concat(first);
    const view = new DataView(bytes.buffer);
    const cuts = [12, 16];
    const security = bytes.length >= 16 ? view.getUint32(12) : 0;
    if (security === 2) {
        cuts.push(32, 36); // challenge, SecurityResult
    } else if (security !== 1) {
        throw new Error(`the recording starts with security type ${security}`);
    }
    const init = cuts[cuts.length - 1];
    if (bytes.length < init + 24) {
        throw new Error("the recording ends before ServerInit");
    }
    cuts.push(init + 24 + view.getUint32(init + 20));
    const t = first[0].t;
    const out = [];
    let at = 0;
    for (const cut of cuts) {
        out.push({ t, data: bytes.subarray(at, cut), alone: true });
        at = cut;
    }
    // What follows ServerInit in those blocks keeps the timestamp of the block it was in.
    let offset = 0;
    for (const b of first) {
        const end = offset + b.data.length;
        if (end > at) {
            out.push({ t: b.t, data: b.data.subarray(Math.max(0, at - offset)) });
        }
        offset = end;
    }
    return out.concat(blocks.slice(k));
}

// What noVNC's Websock needs of a channel (websock.js rawChannelProps).
class ReplayChannel {
    constructor() {
        this.binaryType = "arraybuffer";
        this.protocol = "binary";
        this.readyState = "open";
        this.onopen = null;
        this.onmessage = null;
        this.onclose = null;
        this.onerror = null;
    }
    send() {} // the recording does not listen
    close() {
        this.readyState = "closed";
        setTimeout(() => this.onclose && this.onclose({ code: 1000, reason: "", wasClean: true }));
    }
    push(bytes) {
        if (this.readyState === "open" && this.onmessage) {
            this.onmessage({ data: bytes.slice().buffer });
        }
    }
}

function clock(ms) {
    const s = Math.floor(ms / 1000);
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const ss = String(s % 60).padStart(2, "0");
    return h ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

function concat(blocks) {
    const out = new Uint8Array(blocks.reduce((n, b) => n + b.data.length, 0));
    let at = 0;
    for (const b of blocks) {
        out.set(b.data, at);
        at += b.data.length;
    }
    return out;
}

class Player {
    constructor(blocks) {
        this.blocks = splitHandshake(blocks);
        this.duration = blocks.length ? blocks[blocks.length - 1].t : 0;
        this.next = 0; // index of the first block not yet fed
        this.position = 0; // ms
        this.speed = 1;
        this.playing = false;
        this.ended = false;
        this.timer = null;
        this.rfb = null;
        this.channel = null;
    }

    fresh() {
        if (this.rfb) {
            this.rfb.disconnect();
        }
        $("screen").replaceChildren();
        this.channel = new ReplayChannel();
        this.rfb = new RFB($("screen"), this.channel, { shared: true });
        this.rfb.viewOnly = true;
        this.rfb.scaleViewport = true;
        this.rfb.addEventListener("desktopname", (e) => {
            $("name").textContent = e.detail.name;
            document.title = `${e.detail.name} · recording`;
        });
        this.next = 0;
    }

    // Feed every block up to `ms` at once, in chunks noVNC's queue can hold.
    async feedUntil(ms) {
        const due = [];
        while (this.next < this.blocks.length && this.blocks[this.next].t <= ms) {
            const block = this.blocks[this.next++];
            if (block.alone) {
                this.channel.push(block.data);
            } else {
                due.push(block);
            }
        }
        const bytes = concat(due);
        for (let at = 0; at < bytes.length; at += FEED_CHUNK) {
            this.channel.push(bytes.subarray(at, at + FEED_CHUNK));
            if (bytes.length > FEED_CHUNK) {
                await new Promise((r) => setTimeout(r)); // let image decodes finish
            }
        }
    }

    now() {
        return this.playing
            ? Math.min(this.duration, this.base + (performance.now() - this.wall) * this.speed)
            : this.position;
    }

    play() {
        if (this.ended) {
            this.seek(0);
        }
        this.base = this.position;
        this.wall = performance.now();
        this.playing = true;
        this.tick();
    }

    pause() {
        this.position = this.now();
        this.playing = false;
        clearTimeout(this.timer);
        this.show();
    }

    setSpeed(speed) {
        const playing = this.playing;
        if (playing) this.pause();
        this.speed = speed;
        if (playing) this.play();
    }

    async seek(ms) {
        const playing = this.playing;
        if (playing) this.pause();
        if (ms < this.position || !this.rfb) {
            this.fresh();
        }
        this.position = ms;
        this.ended = false;
        await this.feedUntil(ms);
        this.show();
        if (playing) this.play();
    }

    async tick() {
        if (!this.playing) return;
        this.position = this.now();
        await this.feedUntil(this.position);
        if (this.position >= this.duration) {
            this.playing = false;
            this.ended = true;
            this.show();
            return;
        }
        this.show();
        const nextT = this.next < this.blocks.length ? this.blocks[this.next].t : this.duration;
        const wait = Math.max(0, Math.min(250, (nextT - this.position) / this.speed));
        this.timer = setTimeout(() => this.tick(), wait);
    }

    show() {
        const seek = $("seek");
        seek.max = String(this.duration);
        seek.value = String(Math.round(this.position));
        $("time").textContent = `${clock(this.position)} / ${clock(this.duration)}`;
        $("play").textContent = this.playing ? "Pause" : "Play";
        $("status").textContent = this.ended ? "ended" : this.playing ? "playing" : "paused";
        document.body.dataset.state = $("status").textContent;
    }
}

async function load(ticket) {
    if (!ticket) {
        throw new Error("this link has no playback ticket");
    }
    const answer = await fetch(`data?ticket=${encodeURIComponent(ticket)}`, { cache: "no-store" });
    if (!answer.ok) {
        throw new Error((await answer.text()).trim() || `HTTP ${answer.status}`);
    }
    return parseFbs(await answer.arrayBuffer());
}

async function main() {
    const ticket = new URLSearchParams(location.hash.slice(1)).get("ticket");
    const autoplay = new URLSearchParams(location.search).get("autoplay") !== "0";
    history.replaceState(null, "", location.pathname); // the ticket off the address bar
    let blocks;
    try {
        blocks = await load(ticket);
    } catch (e) {
        $("status").textContent = `cannot play: ${e.message}`;
        document.body.dataset.state = "failed";
        return;
    }
    const player = new Player(blocks);
    window.cpvmPlayer = player; // for the tests and the curious
    await player.seek(0);
    $("play").disabled = false;
    $("seek").disabled = false;
    $("play").addEventListener("click", () => (player.playing ? player.pause() : player.play()));
    $("seek").addEventListener("change", (e) => player.seek(Number(e.target.value)));
    $("speed").addEventListener("change", (e) => player.setSpeed(Number(e.target.value)));
    player.show();
    if (autoplay) {
        player.play();
    }
}

main();
