"""A Python client for a ptmserve server (KServe v2 with binary tensors, over httpx).

from ptmserve.client import Client

with Client("http://127.0.0.1:8000") as c:
    vectors = c.embed("all-MiniLM-L6-v2", ["hello", "world"]).embeddings  # (2, 384) float32
    print(c.complete("smollm2", "Once upon a time", max_tokens=20).text)
    for text in c.chat("smollm2", [{"role": "user", "content": "Hi"}], stream=True):
        print(text, end="")
"""

from ptmserve.client.calls import Health, ModelStatus, ServerError
from ptmserve.client.client import AsyncClient, Client
from ptmserve.client.generation import AsyncCompletionStream, Completion, CompletionStream, Usage

__all__ = [
    "AsyncClient",
    "AsyncCompletionStream",
    "Client",
    "Completion",
    "CompletionStream",
    "Health",
    "ModelStatus",
    "ServerError",
    "Usage",
]
