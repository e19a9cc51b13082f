"""Session recording: the console's server→client stream in FBS 001.000, written off the
reactor thread, kept by a retention policy and played back in the browser.

- :mod:`.fbs` — the sans-IO encoder (synthetic handshake, timestamped blocks);
- :mod:`.writer` — the bounded, thread-drained file writer and its failure signal;
- :mod:`.recorder` — one session's recording (the main file and the optional input file);
- :mod:`.retention` — which recordings to delete (sans-IO) and the service that does it;
- :mod:`.player` — the playback page and the one-time download of a recording.

See docs/recording.md.
"""
