"""Server RSS over sustained load: 5 rounds of 3000 requests at 256 clients (api-batching.json)."""
import asyncio
import json
import sys

sys.path.insert(0, "benchmarks")
from pathlib import Path

from api_latency import measure, rss_mib, sample_png, started_server

opts = sys.argv[2].split() if len(sys.argv) > 2 else []
with started_server(Path(sys.argv[1]), opts) as (url, pid):
    img = sample_png()
    out = [("start", rss_mib(pid))]
    for i in range(5):
        r = asyncio.run(measure(url, 3000, 256, img))
        out.append((f"round {i+1}: {r['requests_per_s']} rps, errors {r['errors']}", rss_mib(pid)))
    print(json.dumps(out))
