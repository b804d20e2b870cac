#!/bin/bash
# queue 3 (started after queue 1): 4x4 BadNets + clean seed 4, NC then TABOR; then clean seed 5 the same
set -x
cd /tmp/shapes_proto2; export PYTHONPATH=/work/main
M=models/rgb32-hex_n1500_e20
nice -n 10 python train.py rgb32-hex --ntr 1500 --epochs 20 badnets-4x4 clean-s4
nice -n 10 python scan.py $M/badnets-4x4 $M/clean-s4
nice -n 10 python scan.py --method tabor $M/badnets-4x4 $M/clean-s4
nice -n 10 python train.py rgb32-hex --ntr 1500 --epochs 20 clean-s5
nice -n 10 python scan.py $M/clean-s5
nice -n 10 python scan.py --method tabor $M/clean-s5
