"""Training stages; each module exposes `main(argv=None)` and runs as `python -m rlhf.stages.<name>`."""
