"""The capacity benchmark's order check (bench/capacity.py): how many of a room's messages reach
the homeserver after one sent later had already arrived, repeats and strays counted apart."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from capacity import order_report, out_of_order


@pytest.mark.parametrize(
    ("ranks", "expected"),
    [
        ([], 0),
        ([0, 1, 2, 3], 0),
        ([1, 0, 2, 3], 1),  # 0 came after 1
        ([3, 0, 1, 2], 3),  # everything after 3 is late
        ([0, 2, 1, 3, 5, 4], 2),
        ([2, 3, 0, 1], 2),  # two replicas, one slice each, the later slice first
    ],
)
def test_out_of_order_counts_arrivals_after_a_later_event(ranks: list[int], expected: int) -> None:
    assert out_of_order(ranks) == expected


def test_report_keeps_rooms_apart() -> None:
    send_order = {"!a": ["a0", "a1", "a2"], "!b": ["b0", "b1"]}
    # Interleaving rooms is fine; only the order within a room counts.
    arrivals = [("!b", "b0"), ("!a", "a0"), ("!b", "b1"), ("!a", "a1"), ("!a", "a2")]
    report = order_report(send_order, arrivals)
    assert (report.expected, report.arrived, report.out_of_order) == (5, 5, 0)
    assert report.rooms_out_of_order == 0


def test_report_counts_inversions_repeats_and_missing_events() -> None:
    send_order = {"!a": ["a0", "a1", "a2", "a3"], "!b": ["b0", "b1"]}
    arrivals = [
        ("!a", "a2"),
        ("!a", "a0"),  # after a2: out of order
        ("!a", "a0"),  # a repeat: a duplicate, not out of order again
        ("!a", "a3"),
        ("!b", "b0"),
        ("!a", "a1"),  # after a3: out of order
    ]
    report = order_report(send_order, arrivals)
    assert report.out_of_order == 2
    assert report.duplicates == 1
    assert report.arrived == 5
    assert report.expected - report.arrived == 1  # b1 never came
    assert report.per_room == {"!a": 2, "!b": 0}
    assert report.rooms_out_of_order == 1


def test_an_event_in_the_wrong_room_is_out_of_order() -> None:
    report = order_report({"!a": ["a0"], "!b": ["b0"]}, [("!b", "a0"), ("!a", "a0")])
    assert report.out_of_order == 1
    assert report.arrived == 1
