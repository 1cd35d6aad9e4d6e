"""Local lm-eval task templates (``dataset_path: json``, offline) shared by the lm-eval tests and the
FSDP gather fit: ``TEMPLATE.format(folder=...)`` points a task at ``<folder>/<name>.jsonl``."""

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""
GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}="
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
      - function: take_first
metadata:
  version: 2.0
"""
GROUP_YAML = """group: tiny_group
task: [tiny_mc, tiny_mc2]
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
metadata:
  version: 3.0
"""
