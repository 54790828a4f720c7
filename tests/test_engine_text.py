"""Stop strings split across tokens and UTF-8 split across tokens never reach the client broken."""

from corral.engine.text import StopMatcher, TextStream


def feed_all(matcher, pieces):
    out, stopped = "", False
    for p in pieces:
        text, stopped = matcher.feed(p)
        out += text
        if stopped:
            break
    return out, stopped


def test_stop_split_across_pieces_is_held_back_and_cut():
    out, stopped = feed_all(StopMatcher(["User:"]), ["Hello ", "Us", "er", ": more"])
    assert (out, stopped) == ("Hello ", True)


def test_a_false_start_is_released():
    m = StopMatcher(["User:"])
    assert m.feed("Hi Us") == ("Hi ", False)
    assert m.feed("ual") == ("Usual", False)


def test_earliest_of_several_stops_wins():
    assert StopMatcher(["b", "a"]).feed("xxabyy") == ("xx", True)


def test_flush_releases_a_pending_prefix():
    m = StopMatcher(["###"])
    assert m.feed("end #") == ("end ", False)
    assert m.flush() == "#"


def test_no_stops_passes_everything():
    assert StopMatcher([]).feed("abc") == ("abc", False)


def test_utf8_split_across_tokens():
    s = TextStream([])
    data = "héllo 🐉".encode()
    out = "".join(s.feed(data[i : i + 1])[0] for i in range(len(data)))
    assert out + s.finish() == "héllo 🐉"


def test_stop_inside_multibyte_text():
    s = TextStream(["🐉"])
    data = "a🐉b".encode()
    text, stopped = "", False
    for i in range(len(data)):
        piece, stopped = s.feed(data[i : i + 1])
        text += piece
        if stopped:
            break
    assert (text, stopped) == ("a", True)
