import sys
sys.path.insert(0, "/work/main/bench")
import sparsec.distill as d
d.VALIDATION_EVERY = int(sys.argv[1])
import forced_accuracy
forced_accuracy.main(sys.argv[2:])
