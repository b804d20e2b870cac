#!/bin/bash
# queue 4 (started after queue 2): clean seeds 6 and 7, NC then TABOR
set -x
cd /tmp/shapes_proto2; export PYTHONPATH=/work/main
M=models/rgb32-hex_n1500_e20
nice -n 10 python train.py rgb32-hex --ntr 1500 --epochs 20 clean-s6 clean-s7
nice -n 10 python scan.py $M/clean-s6 $M/clean-s7
nice -n 10 python scan.py --method tabor $M/clean-s6 $M/clean-s7
