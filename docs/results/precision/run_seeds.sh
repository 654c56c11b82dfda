#!/bin/bash
while [ ! -f /tmp/prec_results/DONE ]; do sleep 20; done
cd /work/main
export PYTHONPATH=src
for seed in 1 2; do
  for n in shot thermal weight; do
    python -m abfp precision --task fashion-cnn --noise $n --seed $seed --threads 1 --json /tmp/prec_results/seeds/cnn_${n}_s${seed}.json > /tmp/prec_results/seeds/cnn_${n}_s${seed}.log 2>&1
  done
done
python -m abfp precision --task fashion-cnn --noise shot --search-seeds 3 --threads 1 --json /tmp/prec_results/seeds/cnn_shot_ss3.json > /tmp/prec_results/seeds/cnn_shot_ss3.log 2>&1
echo done > /tmp/prec_results/seeds/DONE
