"""The seed example, differentiated by a gradient server: one line differs from the original.

``g.backward()`` becomes ``client.backward(g)``; everything else, including
the printed numbers (24.7041, 138.8338, 645.5773), is the same as in
``examples/seed.py``.

    ./scripts/serve &
    python examples/seed_remote.py --target 127.0.0.1:50051
"""

import argparse

from micrograd.client import Client
from micrograd.engine import Value

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
client = Client(parser.parse_args().target)

a = Value(-4.0)
b = Value(2.0)
c = a + b
d = a * b + b**3
c += c + 1
c += 1 + c + (-a)
d += d * 2 + (b + a).relu()
d += 3 * d + (b - a).relu()
e = c - d
f = e**2
g = f / 2.0
g += 10.0 / f
print(f'{g.data:.4f}') # prints 24.7041, the outcome of this forward pass
client.backward(g)
print(f'{a.grad:.4f}') # prints 138.8338, i.e. the numerical value of dg/da
print(f'{b.grad:.4f}') # prints 645.5773, i.e. the numerical value of dg/db
client.close()
