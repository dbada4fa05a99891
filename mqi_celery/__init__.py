"""mqi-celery: proton-therapy delivery logs recomputed by MOQUI, unattended.

``celery -A mqi_celery worker -Q transfer`` finds the Celery application here.
"""
from .celery_app import app

__all__ = ["app"]
