"""Streaming and verbatim-source behaviour that jupyter_kernel_test does not cover.

One kernel (started through jupyter_client's KernelManager / BlockingKernelClient, with
the shared local service) serves the whole module. ``kernel_helpers.run_cell`` records
when every IOPub message reached this process, so "output arrives while the cell runs"
is checked against the clock rather than inferred from message order.

The verbatim tests send source full of things a shell would interpret (backticks,
``$(…)``, quotes, backslashes, escapes, emoji, a 500 KB literal) and compare what the
cell prints with values computed here from the same literals.
"""

from __future__ import annotations

import ast
import hashlib
import random

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from kernel_helpers import Kernels, env_for_kernel, run_cell

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def kc(request: pytest.FixtureRequest, kernels: Kernels) -> BlockingKernelClient:
    # kernels.start runs the first cell, which waits for the sandbox, so that wait
    # stays out of the timings below.
    return kernels.start(env_for_kernel(request)).kc


@pytest.mark.parametrize("flush", [True, False], ids=["flush", "no-flush"])
def test_output_arrives_while_the_cell_runs(kc: BlockingKernelClient, flush: bool) -> None:
    # Without flush=True a local IPython kernel still shows each line within ~0.2 s
    # (its stdout is flushed on a timer), so the sandbox must not hold output back
    # until the cell ends either.
    code = f"for i in range(6):\n    print(f'tick {{i}}', flush={flush})\n    time.sleep(0.5)\n"
    run = run_cell(kc, code, timeout=60)

    assert run.status == "ok", run.describe()
    assert run.stdout == "".join(f"tick {i}\n" for i in range(6))
    first_stdout = min(
        t
        for m, t in zip(run.outputs, run.output_times, strict=True)
        if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
    )
    lead = run.reply_at - first_stdout
    assert lead >= 2.0, (
        f"first stdout arrived only {lead:.2f} s before the execute_reply "
        f"({first_stdout - run.sent_at:.2f} s after the request); output is not streamed"
    )


def _big_literal(size: int) -> str:
    """``size`` characters that need no escaping inside a triple-double-quoted literal.

    IPython rewrites some lines of a cell before compiling it, even inside strings (the
    stock kernel does the same): it strips ``>>> ``/``... `` prompts and empties
    whitespace-only lines. So: no ``>`` or ``.``, and every line starts with a visible
    character. That is IPython's business; this test is about the transport.
    """
    rng = random.Random(20240601)
    visible = "abcXYZ0189`$(){}[]!#%&*;|<~^'=+-_,:?@"
    alphabet = visible + " \t"
    lines: list[str] = []
    length = 0
    while length < size:
        line = rng.choice(visible) + "".join(rng.choices(alphabet, k=rng.randrange(120)))
        lines.append(line)
        length += len(line) + 1
    return "\n".join(lines)[:size]


# Python literals as they appear in the cell's source. Each must reach the interpreter
# unchanged; its value is computed here with ast.literal_eval from the same text.
LITERALS = [
    '"`uname -a` and ``double backticks``"',
    '"$(echo injected) ${HOME} $HOME $$ $? $(( 1 + 1 ))"',
    "'single \\'escaped\\' \"double\" ; echo \"$(id)\" '",
    '"""triple "" \'\' quotes"""',
    r'"back\\slash \\n \\\\ \\x41 end"',
    r'"escapes \n\t\r \x41 \u00e9 \N{SNAKE}"',
    r'"a\x00b"',  # an escape that evaluates to a NUL character
    r'r"a\x00b"',  # the same six characters, raw: no NUL
    "'%s %d {0} {name} %%'",
    '"🐍🚀👩\u200d💻 ñ 漢字 Ελληνικά"',
    "'''; rm -rf / # \\'\"'\"' EOF\n<<EOF\n'''",
    '"""' + _big_literal(500 * 1024) + '"""',
]


def _line(value: str) -> str:
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()
    return f"{len(value)} {digest} {ascii(value)[:60]}"


def test_source_runs_verbatim(kc: BlockingKernelClient) -> None:
    code = (
        "import hashlib as _h\n"
        "# a comment with shell syntax: `reboot` $(reboot) ' \" \\ ; | &&\n"
        "_values = [\n" + "".join(f"    {lit},\n" for lit in LITERALS) + "]\n"
        "for _v in _values:\n"
        "    print(len(_v), _h.sha256(_v.encode('utf-8')).hexdigest(), ascii(_v)[:60])\n"
    )
    assert len(code) > 500 * 1024
    expected = "".join(_line(ast.literal_eval(lit)) + "\n" for lit in LITERALS)

    run = run_cell(kc, code, timeout=120)

    assert run.status == "ok", run.describe()
    assert run.stdout == expected
    assert run.stderr == ""


def test_nul_escape_and_raw_form(kc: BlockingKernelClient) -> None:
    # The six characters a \ x 0 0 b in the source: an escape Python turns into a NUL,
    # and the same six characters in a raw string, where they stay six characters.
    run = run_cell(kc, 's = "a\\x00b"\nr = r"a\\x00b"\nprint(len(s), ord(s[1]), len(r), r)')
    assert run.status == "ok", run.describe()
    assert run.stdout == "3 0 6 a\\x00b\n"


def test_real_nul_in_source_reaches_python(kc: BlockingKernelClient) -> None:
    # An actual NUL character inside a string literal. Python refuses such source; the
    # kernel must deliver it intact (not drop it, not cut the cell there), so the cell
    # fails exactly as compiling the same source here fails.
    code = 's = "a\x00b"\nprint(len(s))'
    with pytest.raises(SyntaxError) as compiled:
        compile(code, "<cell>", "exec")
    run = run_cell(kc, code)
    assert run.status == "error", run.describe()
    errors = [m["content"] for m in run.outputs if m["msg_type"] == "error"]
    assert [e["ename"] for e in errors] == ["SyntaxError"], run.describe()
    assert errors[0]["evalue"].startswith(str(compiled.value.msg)), run.describe()
    assert run.stdout == ""

    after = run_cell(kc, "print('still fine')")
    assert after.stdout == "still fine\n", after.describe()


def test_emoji_and_combining_sequences_print_verbatim(kc: BlockingKernelClient) -> None:
    text = "👩\u200d👩\u200d👧 🇵🇹 é (e + U+0301: e\u0301) \U0001d518\U0001d52b"
    run = run_cell(kc, f"print({text!r})\nprint(len({text!r}))")
    assert run.status == "ok", run.describe()
    assert run.stdout == f"{text}\n{len(text)}\n"
