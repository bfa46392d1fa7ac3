"""The only package that imports ray: Ray Data caching, Ray Train training, Ray Tune sweeps and
the Ray tasks of the evaluations."""


def root_cause(error: BaseException) -> str:
    """The last line of a (possibly nested, remote) error: where Ray puts the original message."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]
