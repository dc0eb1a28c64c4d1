"""A Python client for a ptmserve server (KServe v2 with binary tensors, over httpx).

from ptmserve.client import Client

with Client("http://127.0.0.1:8000") as c:
    vectors = c.embed("all-MiniLM-L6-v2", ["hello", "world"]).embeddings  # (2, 384) float32
"""

from ptmserve.client.calls import Health, ModelStatus, ServerError
from ptmserve.client.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client", "Health", "ModelStatus", "ServerError"]
