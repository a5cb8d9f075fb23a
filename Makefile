# The two set-up commands of the README. Each creates the environment on first use (tools/in-env.sh).
.PHONY: demo test

demo:
	tools/in-env.sh python3 -m moe_ops.demo $(ARGS)

test:
	tools/in-env.sh python3 -m pytest $(ARGS)
