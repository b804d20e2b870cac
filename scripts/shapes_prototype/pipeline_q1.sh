#!/bin/bash
# queue 1: clean seeds 1-3, their NC scans, then TABOR on the four clean models
set -x
cd /tmp/shapes_proto2; export PYTHONPATH=/work/main
M=models/rgb32-hex_n1500_e20
nice -n 10 python train.py rgb32-hex --ntr 1500 --epochs 20 clean-s1 clean-s2 clean-s3
nice -n 10 python scan.py $M/clean-s1 $M/clean-s2 $M/clean-s3
nice -n 10 python scan.py --method tabor $M/clean-s0 $M/clean-s1 $M/clean-s2 $M/clean-s3
