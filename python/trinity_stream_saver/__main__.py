"""``python -m trinity_stream_saver``: the command line."""

from .cli import main

raise SystemExit(main(prog="python -m trinity_stream_saver"))
