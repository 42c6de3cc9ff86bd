"""OpenAI-style speech server (``mctp serve``): FastAPI app, one generation worker, web page.

Needs the ``serve`` extra (``pip install 'mctp[serve]'``); importing this package does not
import FastAPI until :func:`create_app` or :func:`serve` is called.
"""

from .app import ServerConfig, create_app, serve
from .worker import GenerationWorker, Job, Preparation, QueueFull

__all__ = [
    "GenerationWorker",
    "Job",
    "Preparation",
    "QueueFull",
    "ServerConfig",
    "create_app",
    "serve",
]
