"""Development tooling: the embedded stack, demo, replay, chaos suite, benchmarks and
generated docs. The runtime (scorer, trainer) never imports this package."""
