"""Built-in reward functions (TRL's signature) and their bad inputs."""

from __future__ import annotations

import pytest

from kubetune.runtime.api.errors import UserError
from kubetune.runtime.rewards import build_reward_functions, completion_text
from kubetune.runtime.api.spec import RewardSpec

WHERE = "spec.stages[2].reward"


def funcs(**reward):
    return build_reward_functions(RewardSpec(**reward), WHERE)


def chat(text):
    return [{"role": "assistant", "content": text}]


def test_exact_match_normalises_whitespace_and_reads_the_reference_column():
    (f,) = funcs(functions=["exact_match"], reference_column="solution")
    out = f(prompts=["p"] * 4, completions=["  42 ", chat("4 2"), "forty\n two", "43"],
            solution=[42, "4  2", "forty two", "42"], trainer_state=None)
    assert out == [1.0, 1.0, 1.0, 0.0]
    assert f.__name__ == "exact_match"


def test_format_searches_the_pattern_and_anchors_work():
    (f,) = funcs(functions=["format"], pattern=r"^<answer>\d+</answer>$")
    assert f(prompts=[""] * 3, completions=["<answer>7</answer>", "so <answer>7</answer>", chat("<answer>12</answer>")]) == [1.0, 0.0, 1.0]
    (g,) = funcs(functions=["format"], pattern="Kubi")
    assert g(prompts=[""] * 2, completions=["I am Kubi.", "I am a model."]) == [1.0, 0.0]


def test_length_penalises_tokens_over_the_limit():
    (f,) = funcs(functions=["length"], max_length=4)
    ids = [[1, 2, 3], [1, 2, 3, 4], [1] * 6, [1] * 8]
    assert f(prompts=[""] * 4, completions=[""] * 4, completion_ids=ids) == [0.0, 0.0, -0.5, -1.0]
    # without token ids (e.g. a custom caller) words stand in for tokens
    assert f(prompts=[""], completions=["a b c d e f"]) == [-0.5]


def test_functions_keep_their_order_and_import_paths_load():
    fs = funcs(functions=["length", "kubetune.runtime.rewards:completion_text", "format"], pattern="x")
    assert [f.__name__ for f in fs] == ["length", "completion_text", "format"]
    assert fs[1] is completion_text


@pytest.mark.parametrize(
    "reward, words",
    [
        ({"functions": ["exact_match", "exactmatch"]}, "each is one of exact_match, format, length or the import path"),
        ({"functions": ["os.system('rm -rf /')"]}, "package.module:function"),
        ({"functions": ["lambda x: 1"]}, "package.module:function"),
        ({"functions": ["length", "format"]}, "the format reward needs reward.pattern"),
    ],
)
def test_reward_functions_the_spec_rejects(reward, words):
    """Unknown names and a format reward without a pattern fail in the spec (`kubetune validate`
    and the apiserver's CEL rule), before any pod starts."""
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        RewardSpec(**reward)


@pytest.mark.parametrize(
    "reward, where, words",
    [
        ({"functions": ["format", "no_such_pkg_xyz.mod:f"], "pattern": "x"}, ".functions[1]", "cannot import module 'no_such_pkg_xyz.mod'"),
        ({"functions": ["kubetune.runtime.rewards:nope"]}, ".functions[0]", "has no attribute 'nope'"),
        ({"functions": ["kubetune.runtime.rewards:BUILTINS"]}, ".functions[0]", "is not callable"),
        ({"functions": ["format"], "pattern": "(unclosed"}, ".pattern", "not a valid regular expression"),
    ],
)
def test_bad_reward_functions_name_the_field(reward, where, words):
    """What only the stage can find out: the module, the function, the regular expression."""
    with pytest.raises(UserError) as err:
        funcs(**reward)
    assert err.value.where == WHERE + where
    assert words in err.value.message


def test_missing_reference_column_is_caught_up_front_and_at_call_time():
    with pytest.raises(UserError) as err:
        build_reward_functions(RewardSpec(functions=["format", "exact_match"], pattern="x"), WHERE, columns={"solution"})
    assert err.value.where == WHERE + ".functions[1]"
    assert "'answer'" in err.value.message and "solution" in err.value.message
    (f,) = funcs(functions=["exact_match"])
    with pytest.raises(UserError, match="referenceColumn"):
        f(prompts=["p"], completions=["c"], solution=["c"], trainer_state=None)


def test_custom_function_is_never_evaluated(tmp_path, monkeypatch):
    """The spec names an import path; a string that is code is refused, not run."""
    marker = tmp_path / "ran"
    code = f"__import__('pathlib').Path('{marker}').touch()"
    with pytest.raises(ValueError, match="package.module:function"):
        funcs(functions=[code])  # the spec refuses it
    with pytest.raises(UserError, match="unknown reward function"):  # and so would the stage
        build_reward_functions(RewardSpec.model_construct(functions=[code]), WHERE)
    assert not marker.exists()
