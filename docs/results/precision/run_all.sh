#!/bin/bash
cd /work/main
export PYTHONPATH=src
for t in fashion-cnn fashion-vit; do
  for n in shot thermal weight; do
    s=${t#fashion-}
    python -m abfp precision --task $t --noise $n --threads 1 --json /tmp/prec_results/${s}_${n}.json > /tmp/prec_results/${s}_${n}.log 2>&1
  done
done
for n in shot thermal weight; do
  python -m abfp precision --task fashion-cnn --noise $n --per-channel --threads 1 --json /tmp/prec_results/cnn_${n}_pc.json > /tmp/prec_results/cnn_${n}_pc.log 2>&1
done
python -m abfp precision --task fashion-vit --noise shot --per-channel --threads 1 --json /tmp/prec_results/vit_shot_pc.json > /tmp/prec_results/vit_shot_pc.log 2>&1
echo done > /tmp/prec_results/DONE
