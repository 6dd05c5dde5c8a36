"""Connected components of label maps: the largest-component post-processing, and whether a class is one piece.

One owner for connectivity: inference keeps each class's largest piece (26-connected), the phantom keeps its liver
whole (6-connected), and prepare and plan ask whether the labels are one piece per class, which is when keeping the
largest predicted piece is right.
"""

from __future__ import annotations

import numpy as np

ONE_PIECE = 0.9  # a class whose largest piece holds this share of its voxels (in 9 of 10 cases) is one structure


CONNECTIVITY = {6: 1, 18: 2, 26: 3}  # neighbours -> scipy's generate_binary_structure(3, rank)


def connected_pieces(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Each connected piece of a boolean mask numbered from 1, and their count (26-connected: voxels touching at a
    corner are one piece; 18: at an edge; 6: only at a face)."""
    from scipy import ndimage

    return ndimage.label(mask, structure=ndimage.generate_binary_structure(3, CONNECTIVITY[connectivity]))


def largest_component(mask: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """The largest connected piece of a boolean mask; a mask of one piece or none is returned as it is."""
    pieces, count = connected_pieces(mask, connectivity)
    if count <= 1:
        return mask
    return pieces == np.argmax(np.bincount(pieces.ravel())[1:]) + 1


def keep_largest_component(labels: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Per foreground class, drop every connected component but the largest."""
    out = labels.copy()
    for cls in np.unique(labels):
        if cls != 0:
            mask = labels == cls
            out[mask & ~largest_component(mask, connectivity)] = 0
    return out


def largest_piece_shares(label: np.ndarray, num_classes: int) -> list[float | None]:
    """Per foreground class, the share of its voxels in its largest piece (None where it is absent), with the
    connectivity of the largest-component filter."""
    from scipy import ndimage

    shares: list[float | None] = []
    for cls, box in enumerate(ndimage.find_objects(label, max_label=num_classes - 1), start=1):
        if box is None:
            shares.append(None)
            continue
        pieces, _ = connected_pieces(label[box] == cls)
        sizes = np.bincount(pieces.ravel())[1:]
        shares.append(float(sizes.max() / sizes.sum()))
    return shares


def split_classes(shares_per_case: list[list[float | None]]) -> list[int] | None:
    """The foreground classes (1-based) that are not one piece: whose largest piece holds less than ONE_PIECE of
    them in more than 1 case of 10. None when no case holds any foreground."""
    by_class = [[share for share in shares if share is not None] for shares in zip(*shares_per_case)]
    if not any(by_class):
        return None
    return [k for k, shares in enumerate(by_class, start=1) if shares and np.percentile(shares, 10) < ONE_PIECE]
