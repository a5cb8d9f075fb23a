# The two set-up commands of the README. Each creates the environment on first use (tools/in-env.sh).
.PHONY: demo test test-torch

demo:
	tools/in-env.sh python3 -m moe_ops.demo $(ARGS)

test:
	tools/in-env.sh python3 -m pytest $(ARGS)

# The suite (or ARGS) against another torch release, in its own environment under /tmp: tools/with-torch.sh.
test-torch:
	tools/with-torch.sh $(TORCH) python3 -m pytest $(ARGS)
