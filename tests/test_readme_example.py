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


def test_readme_pair_table_states_the_published_numbers_the_code_uses():
    """The README's CIFAR-100 pair table and rankkd.distill (DKD β, mdistiller's published KD / DKD top-1, which the
    grid runner's table prints beside its own) say the same."""
    from rankkd.recipes import CIFAR100_DKD_BETA, CIFAR100_PUBLISHED_TOP1

    rows = re.findall(r"^\| (\w+) \| \w+ \| \w+ \| 0\.0[15] \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$",
                      (ROOT / "README.md").read_text(), flags=re.MULTILINE)
    assert {pair: (float(beta), {"kd": float(kd), "dkd": float(dkd)}) for pair, beta, kd, dkd in rows} == {
        pair: (CIFAR100_DKD_BETA[pair], CIFAR100_PUBLISHED_TOP1[pair]) for pair in CIFAR100_PUBLISHED_TOP1}
