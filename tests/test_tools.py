"""Tool-call parsers (tool_choice "auto"): each format's calls, plain content otherwise, and the
streaming parser = the whole-text parser for any way the text is cut into deltas."""
import json
import random

import pytest

from cometq.serve.tools import TOOL_PARSERS, StreamingToolParser, parse_tool_calls

NAMES = ("add", "get_weather")
ADD = ("add", {"a": 1, "b": 2})
WEATHER = ("get_weather", {"city": "Paris", "unit": "C"})

# (parser, text, expected: None = plain content, else (content, calls))
CASES = [
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', (None, [ADD])),
    ("hermes", 'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'
               '</tool_call>\n<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>',
     ("Let me check.\n", [WEATHER, ADD])),
    ("hermes", '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}', (None, [ADD])),  # (unclosed at EOS)
    ("hermes", "\n  <tool_call>{\"name\": \"add\"}</tool_call>", (None, [("add", {})])),
    ("hermes", "plain answer, no calls", None),
    ("hermes", "almost <tool_cal", None),
    ("hermes", '<tool_call>{"name": "nope", "arguments": {}}</tool_call>', None),  # (not a tool of the request)
    ("hermes", '<tool_call>{"name": "add", "arguments": [1]}</tool_call>', None),  # (arguments not an object)
    ("hermes", '<tool_call>{"name": "add"} trailing</tool_call>', None),
    ("hermes", '<tool_call>{"name": "add", "arguments": {"a": NaN}}</tool_call>', None),  # (not strict JSON)
    ("hermes", '<tool_call>{"name": "add", "arguments": "{\\"a\\": Infinity}"}</tool_call>', None),
    ("hermes", '<tool_call>{"name": "add"}</tool_call> and then text', None),
    ("llama3_json", '{"name": "add", "parameters": {"a": 1, "b": 2}}', (None, [ADD])),
    ("llama3_json", '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}', (None, [ADD, WEATHER])),
    ("llama3_json", ' {"name": "add", "parameters": {"a": 1, "b": 2}} extra', None),
    ("llama3_json", "The sum is {a + b}.", None),
    ("llama3_json", '{"a": 1}', None),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]', (None, [ADD])),
    ("mistral", 'Calling.[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}, '
                '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}]', ("Calling.", [ADD, WEATHER])),
    ("mistral", '[{"name": "add", "arguments": {"a": 1, "b": 2}}]', (None, [ADD])),  # (the marker dropped)
    ("mistral", "[1, 2] is a list", None),
    ("mistral", "[TOOL_CALLS] not json", None),
    ("pythonic", '[get_weather(city="Paris", unit="C"), add(a=1, b=2)]', (None, [WEATHER, ADD])),
    ("pythonic", '  [add(a=1, b=2)]\n', (None, [ADD])),
    ("pythonic", "[add(1, 2)]", None),  # (positional arguments: no names to give them)
    ("pythonic", "[add(a=x)]", None),  # (not a literal)
    ("pythonic", "[add(a=1e999)]", None),  # (infinite: not JSON)
    ("pythonic", "[print(a=1)]", None),
    ("pythonic", "[1, 2, 3]", None),
    ("pythonic", "The answer: [add(a=1)]", None),
]


@pytest.mark.parametrize("parser,text,want", CASES)
def test_parse_and_stream(parser, text, want):
    got = parse_tool_calls(parser, text, NAMES)
    assert got == (None if want is None else (want[0], [tuple(c) for c in want[1]])), got
    rng = random.Random(len(text))
    for trial in range(30):  # streamed in random deltas: the content sent + what finish() adds = the whole-text answer
        sp = StreamingToolParser(parser, NAMES)
        sent, i = "", 0
        while i < len(text):
            k = rng.randint(1, 6) if trial else 1
            sent += sp.feed(text[i:i + k])
            i += k
        rest, calls = sp.finish()
        if want is None:
            assert sent + rest == text and calls is None
        else:
            assert sent + rest == (want[0] or "") and calls == want[1]
            assert json.dumps([a for _, a in calls])  # (arguments are JSON)


def test_stream_sends_content_early_and_holds_calls():
    sp = StreamingToolParser("hermes", NAMES)
    assert sp.feed("Hello ") == "Hello "  # (no marker can start in it: sent at once)
    assert sp.feed("there <to") == "there "  # (a marker's possible start waits)
    assert sp.feed("ol") == "" and sp.feed('_call>{"name": "add"}') == "" and sp.feed(" more") == ""
    assert sp.finish() == ('<tool_call>{"name": "add"} more', None)  # (not a call after all: all content)
    sp = StreamingToolParser("pythonic", NAMES)
    assert sp.feed("  ") == "" and sp.feed("Sure") == "  Sure"  # (not a list: content from the first letter)
    sp = StreamingToolParser("llama3_json", NAMES)
    assert sp.feed(" {") == "" and sp.feed('"name": "add"}') == ""
    assert sp.finish() == ("", [("add", {})])


def test_unknown_parser():
    with pytest.raises(ValueError, match="unknown tool-call parser 'nope'"):
        parse_tool_calls("nope", "", NAMES)
    with pytest.raises(ValueError, match="known: " + str(sorted(TOOL_PARSERS)).replace("[", r"\[").replace("]", r"\]")):
        StreamingToolParser("nope", NAMES)
