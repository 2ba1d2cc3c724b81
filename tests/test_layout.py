"""The four scripts' form, read from their source: the algorithm first (docstring, Args, the algorithm, main, then
the marked infrastructure), main a loop of a screen or two, every flag explained in --help, the algorithm's pieces
taking plain arguments and copyable on their own, the pieces the scripts share kept as byte-identical copies, and
the line budgets of the lean form."""

import ast

import pytest

from tests.conftest import REPO

# lines from the top to the end of main (the algorithm a reader copies), and between main and the shared block
ALGORITHM_BUDGET = {"rocm_kl": 330, "rocm_fdiv": 375, "rlcm_ppo": 500, "cm_dpo": 540}
OWN_INFRASTRUCTURE_BUDGET = 50
SHARED_BUDGET_LINES = 300
SHARED_BUDGET_BYTES = 19_000
LOSS_FUNCTION = {"rocm_kl": "rocm_loss", "rocm_fdiv": "rocm_loss", "rlcm_ppo": "ppo_clipped_loss",
                 "cm_dpo": "dpo_loss"}
SCRIPTS = tuple(LOSS_FUNCTION)
OWN_DEFINITIONS = {"Args", "main", "validate"}  # the names every script defines its own way
SHARED_BANNER = "# INFRASTRUCTURE: loading, runs and checkpoints, ranks, evaluation and logging"


def source(script: str) -> tuple[str, ast.Module]:
    text = (REPO / f"{script}.py").read_text()
    return text, ast.parse(text)


def top_level_definitions(tree: ast.Module) -> dict[str, ast.AST]:
    return {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_algorithm_comes_first_and_main_is_short(script):
    text, tree = source(script)
    docstring = ast.get_docstring(tree)
    assert docstring and f"Run (GPU):  python {script}.py" in docstring, "the docstring ends with a run command"
    definitions = list(top_level_definitions(tree).values())
    assert definitions[0].name == "Args"
    first_algorithm = definitions[1].lineno - len(definitions[1].decorator_list)
    assert first_algorithm < 160, f"the first algorithm definition starts at line {first_algorithm}"
    by_name = top_level_definitions(tree)
    assert by_name[LOSS_FUNCTION[script]].lineno < 330
    main = by_name["main"]
    assert main.end_lineno - main.lineno + 1 <= 110, "main is the training loop of a screen or two"
    banners = {line: number for number, line in enumerate(text.splitlines(), 1) if line.startswith("# ")}
    algorithm = [number for line, number in banners.items() if line.startswith("# ALGORITHM")]
    infrastructure = [number for line, number in banners.items() if line.startswith("# INFRASTRUCTURE")]
    assert algorithm and min(algorithm) < first_algorithm, "the algorithm section is marked"
    assert infrastructure and min(infrastructure) > main.end_lineno, "all after main is the marked infrastructure"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_a_help_line(script):
    _, tree = source(script)
    body = top_level_definitions(tree)["Args"].body
    undocumented = [field.target.id for field, following in zip(body, [*body[1:], None])
                    if isinstance(field, ast.AnnAssign)
                    and not (isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant))]
    assert not undocumented, f"Args fields without a docstring (tyro's --help text): {undocumented}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_algorithm_takes_plain_arguments_not_args(script):
    """Everything defined above main can be copied into other code: none of it reads the CLI object."""
    _, tree = source(script)
    main_line = top_level_definitions(tree)["main"].lineno
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.lineno < main_line]
    readers = [f.name for f in functions for a in f.args.args + f.args.kwonlyargs
               if a.arg == "args" or (a.annotation is not None and ast.unparse(a.annotation) == "Args")]
    assert functions and not readers, f"functions above main that take Args: {readers}"


def test_shared_pieces_are_byte_identical_copies():
    """diff between two scripts shows only their algorithms: whatever all four define under one name (the LCM
    chain, micro-batching, Run, loading, saving), and the whole shared infrastructure block, is one text."""
    texts, definitions = {}, {}
    for script in SCRIPTS:
        text, tree = source(script)
        texts[script] = text[text.index(SHARED_BANNER):]
        definitions[script] = {name: ast.get_source_segment(text, node)
                               for name, node in top_level_definitions(tree).items()}
    shared = set.intersection(*(set(names) for names in definitions.values())) - OWN_DEFINITIONS
    assert {"consistency_fn", "lcm_schedule", "decode", "Run", "load_lcm", "save_lora"} <= shared
    drifted = sorted(name for name in shared if len({definitions[script][name] for script in SCRIPTS}) > 1)
    assert not drifted, f"defined in all four scripts but not identical: {drifted}"
    assert len(set(texts.values())) == 1, "the shared infrastructure block differs between the scripts"


def shared_block(script: str) -> str:
    text, _ = source(script)
    return text[text.rindex("\n# ---", 0, text.index(SHARED_BANNER)) + 1:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_algorithm_part_copies_out_alone(script):
    """Nothing defined above main uses a name defined below it: the part a reader copies runs on its own."""
    _, tree = source(script)
    definitions = top_level_definitions(tree)
    main = definitions["main"]
    below = {name for name, node in definitions.items() if node.lineno > main.end_lineno}
    below |= {target.id for node in tree.body if isinstance(node, ast.Assign) and node.lineno > main.end_lineno
              for target in node.targets if isinstance(target, ast.Name)}
    uses = {name: {node.id for node in ast.walk(definition) if isinstance(node, ast.Name)} & below
            for name, definition in definitions.items() if definition.lineno < main.lineno}
    assert not {name: used for name, used in uses.items() if used}


@pytest.mark.parametrize("script", SCRIPTS)
def test_line_budgets_of_the_lean_form(script):
    text, tree = source(script)
    main = top_level_definitions(tree)["main"]
    shared = shared_block(script)
    own = len(text.splitlines()) - len(shared.splitlines()) - main.end_lineno
    assert main.end_lineno <= ALGORITHM_BUDGET[script], f"algorithm part {main.end_lineno} lines"
    assert own <= OWN_INFRASTRUCTURE_BUDGET, f"own infrastructure {own} lines"
    assert max(len(line) for line in text.splitlines()) <= 120


@pytest.mark.xfail(strict=True, reason="the shared block is about 440 lines / 27 kB: its 300-line, 19,000-byte "
                   "budget is not met yet (strict: this marker must go once it is)")
def test_the_shared_block_is_within_its_budget():
    shared = shared_block("rocm_kl")
    assert len(shared.splitlines()) <= SHARED_BUDGET_LINES, f"shared block {len(shared.splitlines())} lines"
    assert len(shared.encode()) <= SHARED_BUDGET_BYTES, f"shared block {len(shared.encode())} bytes"
