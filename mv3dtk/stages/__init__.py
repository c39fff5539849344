"""One thin module per stage: parse options, call a library function. No logic lives here, and
nothing heavy is imported at module level (``mv3d --help`` imports every stage module)."""
