"""Performance targets, each stored next to the value it was checked against."""

from __future__ import annotations

SPEEDUP_TARGETS = {"dense/lazy": 15.0, "dense/sparse": 8.0}
EFFICIENCY_TARGETS = {"rtrl-dense": 0.5, "rtrl-sparse": 0.5}
# rtrl-lazy peak memory may vary by at most this share over the measured lengths.
LAZY_MEMORY_TOLERANCE = 0.10


def at_least(name: str, measured: float | None, minimum: float) -> dict:
    """Return a target record: PASS if ``measured >= minimum``, n/a when not measured."""
    if measured is None:
        status = "n/a"
    else:
        status = "PASS" if measured >= minimum else "FAIL"
    return {"target": name, "required": f">= {minimum:g}", "measured": measured,
            "status": status}


def memory_flatness(lazy: dict[int, float], bptt: dict[int, float]) -> dict:
    """Check that rtrl-lazy peak memory is flat while BPTT peak memory grows.

    Parameters
    ----------
    lazy, bptt : dict of int to float
        Peak memory above the baseline (bytes) by sequence length, measured
        points only.

    Returns
    -------
    dict
        A target record. ``measured`` is ``(max - min) / min`` of the rtrl-lazy
        values. The status is PASS when that is at most the tolerance and the
        BPTT value at the longest length exceeds the one at the shortest by
        more than the same tolerance. It is n/a when the two methods have
        fewer than two lengths in common.
    """
    lengths = sorted(set(lazy) & set(bptt))
    name = "rtrl-lazy peak memory flat while bptt grows"
    required = (f"lazy spread <= {LAZY_MEMORY_TOLERANCE:.0%}, "
                f"bptt rises > {LAZY_MEMORY_TOLERANCE:.0%}")
    if len(lengths) < 2:
        return {"target": name, "required": required, "measured": None, "status": "n/a",
                "lengths": lengths}

    name = f"{name} (T={lengths[0]}..{lengths[-1]})"
    values = [lazy[t] for t in lengths]
    spread = (max(values) - min(values)) / max(min(values), 1.0)
    grows = bptt[lengths[-1]] > (1 + LAZY_MEMORY_TOLERANCE) * bptt[lengths[0]]
    passed = spread <= LAZY_MEMORY_TOLERANCE and grows
    return {"target": name, "required": required, "measured": spread,
            "bptt_grows": grows, "lengths": lengths, "status": "PASS" if passed else "FAIL"}
