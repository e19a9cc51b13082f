"""Coverage-guided fuzzing of cpvm's parsers with atheris (docs/fuzzing.md).

Nothing of cpvm is imported here: the fuzz worker imports the targets under atheris's
instrumentation, which covers only modules imported after it starts.
"""
