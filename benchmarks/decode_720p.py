"""Issue 16 acceptance: decode 17 frames at 720x1280 with the full-size architecture under an 8 GiB budget.

Loads ``random:cvvae-v1`` with ``max_memory`` (what ``--max-memory 8G`` passes), decodes random latents of a
17x720x1280 video with the plan the budget picks, and prints every tile's shape, time and the process's peak RSS
so far, then the total. About 55 minutes on 2 AVX2 cores (28 tiles of 256 px).

    python benchmarks/decode_720p.py [--budget-gib 8]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from cvvae.runtime import backends
from cvvae.runtime.api import VideoVAE


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gib", type=float, default=8.0)
    args = parser.parse_args()
    vae = VideoVAE.load("random:cvvae-v1", max_memory=int(args.budget_gib * 2**30))
    print("settings:", vae.settings_for(17, 720, 1280, ("decode",)), flush=True)
    decoder, start, tiles = backends.TorchBackend.decoder, time.time(), [0]

    def logged(self, latent):
        t = time.time()
        y = decoder(self, latent)
        tiles[0] += 1
        print(f"tile {tiles[0]} latent {tuple(latent.shape)} -> {tuple(y.shape)} {time.time() - t:.0f}s "
              f"(elapsed {time.time() - start:.0f}s) peak RSS {peak_rss_gib():.2f} GiB", flush=True)
        return y

    backends.TorchBackend.decoder = logged
    z = torch.randn(1, 4, 5, 90, 160, generator=torch.Generator().manual_seed(0))
    out = vae.decode(z.numpy())
    print(f"decoded {out.shape} in {time.time() - start:.0f}s; peak RSS {peak_rss_gib():.2f} GiB "
          f"(budget {args.budget_gib:g} GiB)", flush=True)


if __name__ == "__main__":
    main()
