"""The framework's ceiling: a FastAPI app whose restart route does nothing, served by uvicorn with
the options `python -m app serve` uses (uvloop and httptools when installed, no access log, proxy
headers on, no server header).

    python bench/trivial.py PORT
"""

from __future__ import annotations

import sys
from typing import Any

import uvicorn
from fastapi import FastAPI

app = FastAPI(redirect_slashes=False)


@app.post("/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delay_id}/{action}")
async def act(delay_id: str, action: str) -> dict[str, Any]:
    return {}


@app.get("/health")
async def health() -> dict[str, Any]:
    return {}


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="info",
        access_log=False,
        proxy_headers=True,
        server_header=False,
    )
