"""mqi-celery: proton-therapy delivery logs recomputed by MOQUI, unattended.

``celery -A mqi_celery worker -Q transfer`` finds the Celery application here. It is
imported on first use (PEP 562): ``mqi cases list`` and ``mqi --help`` never load Celery.
"""

__all__ = ["app"]


def __getattr__(name: str):
    if name == "app":
        from .celery_app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
