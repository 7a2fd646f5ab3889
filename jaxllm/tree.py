"""Nested-dict param trees: split by a path predicate, union of disjoint trees, get/set by path, sizes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

Path = tuple[str, ...]


def partition(tree: dict, keep: Callable[[Path], bool] | None) -> tuple[dict, dict]:
    """(leaves where keep(path), the rest), both nested dicts; keep=None puts everything first."""
    if keep is None:
        return tree, {}

    def walk(node, path):
        yes, no = {}, {}
        for key, value in node.items():
            if isinstance(value, dict):
                a, b = walk(value, (*path, key))
                if a:
                    yes[key] = a
                if b:
                    no[key] = b
            elif keep((*path, key)):
                yes[key] = value
            else:
                no[key] = value
        return yes, no

    return walk(tree, ())


def union(a: dict, b: dict) -> dict:
    """The union of two nested dicts with disjoint leaves."""
    out = dict(a)
    for key, value in b.items():
        out[key] = union(out[key], value) if key in out and isinstance(value, dict) else value
    return out


def get(tree: dict, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def has(tree: dict, path: Path) -> bool:
    """Whether `tree` has a leaf at `path`."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return not isinstance(tree, dict)


def put(tree: dict, path: Path, value: Any) -> None:
    """Sets `tree[path]`, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def count(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def nbytes(tree: Any) -> int:
    return sum(int(x.size) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
