"""The only package that imports ray: Ray Data caching, Ray Train training, Ray Tune sweeps and
the Ray tasks of the evaluations."""


def root_cause(error: BaseException) -> str:
    """The last line of a (possibly nested, remote) error: where Ray puts the original message."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def init_ray() -> None:
    """Join the Ray cluster of `ray job submit` (or of `ray start`), else start a local one (whose
    dashboard ray.init binds to 127.0.0.1 by default). One process may run several commands
    (jobs/demo.py runs one per config): it joins once. Ray is imported here, not at the top, so
    that importing this package for `root_cause` stays light."""
    import os

    import ray

    if not ray.is_initialized():
        # RAYSAE_LOCAL_DASHBOARD=0: a local instance without its dashboard (the test suite: its
        # processes cost ~5 s of CPU per start); ignored when joining a running cluster
        dashboard = os.environ.get("RAYSAE_LOCAL_DASHBOARD", "1") != "0"
        ray.init(include_dashboard=None if dashboard else False)
