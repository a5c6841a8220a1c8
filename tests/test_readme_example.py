"""The README's "plug it into your own training loop" example runs as written: the ```python block between the
plug-in example markers of README.md."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
START, END = "<!-- plug-in example start -->", "<!-- plug-in example end -->"


def plug_in_example():
    path = ROOT / "README.md"
    text = path.read_text()
    assert START in text and END in text, f"no {START} ... {END} section in {path}"
    section = text.split(START, 1)[1].split(END, 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, f"expected one ```python block between the markers in {path}"
    return path, blocks[0]


def test_plug_in_example_runs_as_written():
    path, code = plug_in_example()
    exec(compile(code, str(path), "exec"), {"__name__": "readme_example"})
