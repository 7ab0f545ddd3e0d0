"""The hostile clients of the api-guards record, against a running `cifar10-pipeline api` at URL:
python api-guards-probe.py URL, from the repository root."""
import select
import sys
import threading
import time

sys.path.insert(0, ".")  # run from the repository root
import httpx

from tests.pipelines.api.test_guards import connect, png16  # tests/pipelines/test_api_guards.py when measured

url = sys.argv[1]
# 1. Content-Length 2 GB
s = connect(url); s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 2000000000\r\n\r\n--b\r\n")
r = select.select([s], [], [], 5)[0]; print("content-length 2e9: answered within 5 s:", bool(r)); s.close()
# 2. /health during 4 decodes
image = png16(4400, 4400)
ts = [threading.Thread(target=lambda: httpx.post(f"{url}/predict", files=[("files", ("big.png", image))], timeout=120)) for _ in range(4)]
[t.start() for t in ts]; waits = []
while any(t.is_alive() for t in ts):
    a = time.monotonic(); httpx.get(f"{url}/health", timeout=60); waits.append(time.monotonic() - a); time.sleep(0.05)
print(f"/health slowest during decodes: {max(waits)*1000:.0f} ms over {len(waits)} polls")
# 3. pixel bomb
t = time.monotonic(); r = httpx.post(f"{url}/predict", files=[("files", ("bomb.png", png16(9000, 9000)))], timeout=120)
print("9000x9000 16-bit:", r.status_code, f"{time.monotonic()-t:.1f} s")
# 4. slow heads
socks = [connect(url) for _ in range(20)]
for x in socks: x.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
closed = set(); t0 = time.monotonic()
while time.monotonic() - t0 < 8:
    for x in socks:
        if x in closed: continue
        try: x.sendall(b"X-Slow: 1\r\n")
        except OSError: closed.add(x)
    for x in select.select([x for x in socks if x not in closed], [], [], 0.2)[0]:
        if not x.recv(100): closed.add(x)
print(f"slow heads closed after 8 s: {len(closed)} of 20")
