"""docs/tutorial.ipynb runs from top to bottom, and what it prints agrees with the model.

The notebook is executed in a fresh kernel (nbclient + ipykernel), on a copy: the committed file,
with its outputs, stays as it is. About a minute on an idle 2-core machine.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

import minillm
from evals.tasks import capitals

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"


def printed(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs if output.output_type == "stream" and output.name == "stdout")


def test_committed_notebook_carries_its_outputs():
    """So that it reads on GitHub: every code cell was run, in order, and the figures are there."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    images = [output for cell in code for output in cell.outputs if "image/png" in output.get("data", {})]
    assert len(images) >= 5
    assert all(output.output_type != "error" for cell in code for output in cell.outputs)


@pytest.mark.slow
def test_notebook_executes_and_its_findings_match_the_model(smollm2_dir):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # raises CellExecutionError, with the cell's traceback, if any cell fails
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    assert not [output for cell in notebook.cells for output in cell.get("outputs", [])
                if output.output_type == "error"]
    text = printed(notebook)

    # Recompute the logit lens here, from the model's own modules, and compare with what the notebook says.
    model, tokenizer = minillm.load("smollm2-135m")
    task = capitals()
    france = next(example for example in task.examples if example.fields["country"] == "France")
    answer_id = tokenizer.encode(" Paris")[0]
    with torch.no_grad():
        _, states = model(torch.tensor([tokenizer.encode(task.prompt(france))]), output_hidden_states=True)
        top_tokens = model.lm_head(model.norm(states[:, 0, -1])).argmax(dim=-1)  # [L+1]
    L = model.config.num_layers
    first_top = max(j for j in range(L + 1) if top_tokens[j] != answer_id) + 1
    assert top_tokens[L] == answer_id and 0 < first_top <= L
    found = re.search(r"'Paris' is the top token from layer (\d+) of (\d+) on; top token at H\[\d+\]: ' Paris'", text)
    assert found, "the logit-lens summary line is missing"
    assert (int(found[1]), int(found[2])) == (first_top, L)

    # The swap section names a crossover: Rome below it, Paris from it on.
    swap = re.search(r"Rome wins up to k = (\d+), Paris from k = (\d+)", text)
    assert swap and int(swap[2]) == int(swap[1]) + 1 and 0 < int(swap[2]) <= L
    # The efficiency mode produces the same tokens as the plain run, for both kinds it times.
    assert text.count("same tokens: True") == 2
