#!/usr/bin/env python3
"""Writes the key material for benches/load.sh into OUT_DIR, in one pass over the key space.

Key i is the plaintext `bench-key-<i>`, id `b<i:07>` (8 characters), scopes ["read"].

  keys-<n>.toml    keygate key files in the plain form `keygate keys` writes (one
                   `field = value` per line, read by keygate's fast parallel reader)
  map-<n>.conf     nginx `map` entries `"<key>" "<id>";` for the same keys
  valid-<n>.txt    the keys wrk sends, one per line: all of them for n <= 10,000, otherwise a
                   sample of 10,000 spread evenly across the table, shuffled with a fixed seed
                   (so lookups are not all one hot cache line, and every run sends the same)
  reject-unknown.txt  10,000 `not-a-valid-key-<n>`: unknown keys, hashed and looked up
  reject-badcrc.txt   10,000 keys in keygate's own shape `kg_<8 [0-9a-z]>_<32 base62><6 base62>`
                      whose CRC32 checksum is wrong: refused before any lookup

Usage: genkeys.py OUT_DIR N [N…]   (the largest N is generated once; smaller files are its prefixes)
A million keys take about 5 s (SHA-256 of each key, plus ~130 MB of text).
"""

import hashlib
import os
import random
import sys
import zlib

SAMPLE = 10_000
BASE62 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ID_ALPHABET = b"0123456789abcdefghijklmnopqrstuvwxyz"


def key(i: int) -> str:
    return f"bench-key-{i}"


def key_id(i: int) -> str:
    return f"b{i:07d}"


def checksum(body: str) -> str:
    """keygate's checksum: CRC32 of everything before it, base62, zero-padded to 6."""
    n = zlib.crc32(body.encode())
    digits = []
    for _ in range(6):
        digits.append(BASE62[n % 62])
        n //= 62
    return bytes(reversed(digits)).decode()


def bad_checksum_key(rng: random.Random) -> str:
    ident = bytes(rng.choice(ID_ALPHABET) for _ in range(8)).decode()
    secret = bytes(rng.choice(BASE62) for _ in range(32)).decode()
    body = f"kg_{ident}_{secret}"
    good = checksum(body)
    # Change the last checksum character to any other base62 character: right shape, wrong CRC.
    bad = good[:5] + ("0" if good[5] != "0" else "1")
    return body + bad


def write_lines(path: str, lines) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write("\n".join(lines))
        f.write("\n")


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out = sys.argv[1]
    sizes = sorted({int(n) for n in sys.argv[2:]})
    total = sizes[-1]
    os.makedirs(out, exist_ok=True)

    toml_files = {n: open(os.path.join(out, f"keys-{n}.toml"), "w", encoding="ascii") for n in sizes}
    map_files = {n: open(os.path.join(out, f"map-{n}.conf"), "w", encoding="ascii") for n in sizes}
    for n, f in toml_files.items():
        f.write(f"# {n} bench keys for benches/load.sh (plaintext: bench-key-<i>)\n\n")

    chunk = 50_000  # build text in chunks: far faster than one write() per line
    for start in range(0, total, chunk):
        end = min(start + chunk, total)
        entries = []
        maps = []
        for i in range(start, end):
            k = key(i)
            digest = hashlib.sha256(k.encode()).hexdigest()
            ident = key_id(i)
            entries.append(
                f'[[keys]]\nid = "{ident}"\nname = "bench"\nhash = "sha256:{digest}"\nscopes = ["read"]\n\n'
            )
            maps.append(f'"{k}" "{ident}";\n')
        for n in sizes:
            if start >= n:
                continue
            upto = min(end, n) - start
            toml_files[n].write("".join(entries[:upto]))
            map_files[n].write("".join(maps[:upto]))
    for f in (*toml_files.values(), *map_files.values()):
        f.close()

    rng = random.Random(20261122)
    for n in sizes:
        if n <= SAMPLE:
            sample = [key(i) for i in range(n)]
        else:
            stride = n / SAMPLE  # one key from each of SAMPLE equal slices of the table
            sample = [key(int(j * stride) + rng.randrange(int(stride))) for j in range(SAMPLE)]
        rng.shuffle(sample)
        write_lines(os.path.join(out, f"valid-{n}.txt"), sample)

    write_lines(os.path.join(out, "reject-unknown.txt"), (f"not-a-valid-key-{n}" for n in range(SAMPLE)))
    write_lines(os.path.join(out, "reject-badcrc.txt"), (bad_checksum_key(rng) for _ in range(SAMPLE)))


if __name__ == "__main__":
    main()
