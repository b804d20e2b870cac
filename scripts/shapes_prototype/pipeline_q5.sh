#!/bin/bash
# queue 5 (two in parallel): four more BadNets seeds (3x3 checker -> 0), trained and scanned with NC
cd /tmp/shapes_proto2; export PYTHONPATH=/work/main
M=models/rgb32-hex_n1500_e20
(nice -n 10 python train.py rgb32-hex --ntr 1500 --epochs 20 badnets-s15 badnets-s16 && nice -n 10 python scan.py $M/badnets-s15 $M/badnets-s16) > logs/q5a.log 2>&1 &
(nice -n 10 python train.py rgb32-hex --ntr 1500 --epochs 20 badnets-s17 badnets-s18 && nice -n 10 python scan.py $M/badnets-s17 $M/badnets-s18) > logs/q5b.log 2>&1 &
wait
