#!/usr/bin/env python3
"""Independent implementation of nlora-data's documented sampling spec
(crates/nlora-data/src/sampling.rs module docs), used to write the pinned
indices in tests/orders_sampling.rs. Pure Python, no dependencies.

Spec: ChaCha8 (djb layout: 64-bit block counter in words 12-13, stream 0 in
words 14-15), key = seed u64 LE | FNV-1a-64(task name) u64 LE | purpose u64 LE
| 8 zero bytes; purposes validation=1, train=2, test=3. next_u64 = two
consecutive keystream words, low word first. below(n): rejection of
x >= 2^64-1 - ((2^64-1) % n), then x % n. Fisher-Yates from the last index
down. Classes by first appearance, each member list shuffled in that order;
if n < #classes, the class order is shuffled and the first n classes give one
(their first shuffled member); else largest-remainder allocation raised to 1.

usage: sampling_reference.py CL_BENCHMARK_DIR
"""
import json
import struct
import sys

M32 = 0xFFFFFFFF
U64MAX = (1 << 64) - 1


def rotl(v, c):
    return ((v << c) & M32) | (v >> (32 - c))


def chacha_block(key_words, counter, rounds=8):
    const = struct.unpack("<4I", b"expand 32-byte k")
    st = list(const) + key_words + [counter & M32, counter >> 32, 0, 0]
    x = st[:]

    def qr(a, b, c, d):
        x[a] = (x[a] + x[b]) & M32; x[d] = rotl(x[d] ^ x[a], 16)
        x[c] = (x[c] + x[d]) & M32; x[b] = rotl(x[b] ^ x[c], 12)
        x[a] = (x[a] + x[b]) & M32; x[d] = rotl(x[d] ^ x[a], 8)
        x[c] = (x[c] + x[d]) & M32; x[b] = rotl(x[b] ^ x[c], 7)

    for _ in range(rounds // 2):
        qr(0, 4, 8, 12); qr(1, 5, 9, 13); qr(2, 6, 10, 14); qr(3, 7, 11, 15)
        qr(0, 5, 10, 15); qr(1, 6, 11, 12); qr(2, 7, 8, 13); qr(3, 4, 9, 14)
    return [(a + b) & M32 for a, b in zip(x, st)]


class Rng:
    def __init__(self, key_bytes):
        self.key = list(struct.unpack("<8I", key_bytes))
        self.words = []
        self.counter = 0

    def next_u64(self):
        while len(self.words) < 2:
            self.words += chacha_block(self.key, self.counter)
            self.counter += 1
        lo, hi = self.words[0], self.words[1]
        self.words = self.words[2:]
        return lo | (hi << 32)


def fnv1a64(b):
    h = 0xCBF29CE484222325
    for c in b:
        h = ((h ^ c) * 0x100000001B3) & U64MAX
    return h


def stream(seed, task, purpose):
    key = struct.pack("<QQQQ", seed, fnv1a64(task.encode()), purpose, 0)
    return Rng(key)


def below(rng, n):
    zone = U64MAX - (U64MAX % n)
    while True:
        x = rng.next_u64()
        if x < zone:
            return x % n


def shuffle(items, rng):
    for i in range(len(items) - 1, 0, -1):
        j = below(rng, i + 1)
        items[i], items[j] = items[j], items[i]


def allocate(sizes, n):
    total = sum(sizes)
    scaled = [n * s for s in sizes]
    alloc = [max(1, x // total) for x in scaled]
    while sum(alloc) < n:
        cands = [k for k in range(len(sizes)) if alloc[k] < sizes[k]]
        k = max(cands, key=lambda k: (scaled[k] - alloc[k] * total, -k))
        alloc[k] += 1
    while sum(alloc) > n:
        cands = [k for k in range(len(sizes)) if alloc[k] > 1]
        k = max(cands, key=lambda k: (alloc[k] * total - scaled[k], -k))
        alloc[k] -= 1
    return alloc


def stratified(labels, n, rng):
    if n >= len(labels):
        return list(range(len(labels)))
    if n == 0:
        return []
    order, classes = [], {}
    for i, l in enumerate(labels):
        if l not in classes:
            classes[l] = []
            order.append(l)
        classes[l].append(i)
    groups = [classes[l] for l in order]
    for g in groups:
        shuffle(g, rng)
    if n < len(groups):
        ks = list(range(len(groups)))
        shuffle(ks, rng)
        chosen = [groups[k][0] for k in ks[:n]]
    else:
        alloc = allocate([len(g) for g in groups], n)
        chosen = [i for a, g in zip(alloc, groups) for i in g[:a]]
    return sorted(chosen)


def sample(train, test, task, seed, max_train, validation, max_test):
    val = stratified([r["label"] for r in train], validation, stream(seed, task, 1))
    vs = set(val)
    pool = [i for i in range(len(train)) if i not in vs]
    n_train = len(pool) if max_train is None else max_train
    tr = stratified([train[i]["label"] for i in pool], n_train, stream(seed, task, 2))
    n_test = len(test) if max_test is None else max_test
    te = stratified([r["label"] for r in test], n_test, stream(seed, task, 3))
    return val, [pool[i] for i in tr], te


if __name__ == "__main__":
    root = sys.argv[1]
    for task_dir, task, seed, max_train, validation, max_test in [
        ("NLI/CB", "CB", 0, 6, 3, 4),
        ("TC/dbpedia", "dbpedia", 42, 10, 30, 20),
    ]:
        load = lambda f: json.load(open(f"{root}/{task_dir}/{f}", encoding="utf-8"))
        print(task, sample(load("train.json"), load("test.json"), task, seed, max_train, validation, max_test))
