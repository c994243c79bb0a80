"""The pipeline's last stage: every eval set of pipeline.yaml scored for a text tower (through the scoring
library, `litpipe.scoring`), with eval.json, a table and a plot."""
