"""Damage at the end of restart intervals (trailing bytes, a lone 0xFF, an
early marker, a fill byte, extra stuffing): the cases where the destuff pass
and its reader must follow BitReader exactly. Shared by the kernel harness
tests and the GPU tests."""


def interval_markers(payload, starts):
    """Positions of the RST markers that end intervals (the last interval of a
    tile ends at EOI and the next header instead)."""
    ends = starts[1:] - 2
    ok = (payload[ends] == 0xFF) & (payload[ends + 1] >= 0xD0) & (payload[ends + 1] <= 0xD7)
    return ends[ok & (ends - starts[:-1] >= 8)]


def damage_interval_end(kind, payload, marker):
    """One edit of an interval's stream, at its RST marker ``marker``."""
    if kind == "marker_becomes_data":  # two whole bytes after the blocks: trailing data
        payload[marker:marker + 2] = [0x12, 0x34]
    elif kind == "range_ends_in_lone_ff":  # a lone 0xFF at the range end ends the data
        payload[marker:marker + 2] = [0x00, 0xFF]
    elif kind == "early_marker":  # the data stop 4 bytes early: phantom bits, truncation
        payload[marker - 4:marker - 2] = [0xFF, 0xD5]
    elif kind == "fill_byte":  # 0xFF 0xFF: the first is where the data end
        payload[marker - 1] = 0xFF
    elif kind == "stuffing_inserted":  # an extra stuffed 0xFF inside the data
        payload[marker - 6:marker - 4] = [0xFF, 0x00]


STREAM_DAMAGE = ["marker_becomes_data", "range_ends_in_lone_ff", "early_marker", "fill_byte",
                 "stuffing_inserted"]
