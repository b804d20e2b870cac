#!/bin/bash
# queue 2: BadNets seeds 10, 11; NC on them and on clean-s0; TABOR on them; then the extra attack variants
set -x
cd /tmp/shapes_proto2; export PYTHONPATH=/work/main
M=models/rgb32-hex_n1500_e20
nice -n 10 python train.py rgb32-hex --ntr 1500 --epochs 20 badnets-s10 badnets-s11
nice -n 10 python scan.py $M/badnets-s10 $M/badnets-s11 $M/clean-s0
nice -n 10 python scan.py --method tabor $M/badnets-s10 $M/badnets-s11
nice -n 10 python train.py rgb32-hex --ntr 1500 --epochs 20 badnets-t3 badnets-rand
nice -n 10 python scan.py $M/badnets-t3 $M/badnets-rand
nice -n 10 python scan.py --method tabor $M/badnets-t3 $M/badnets-rand
