/* SPDX-License-Identifier: GPL-2.0 */
/* tool.h: what the C tools share beyond sys.h. */
#ifndef SHMBYPASS_TOOL_H
#define SHMBYPASS_TOOL_H

#include <sched.h>

/* Run on CPU cpu only (cpu < 0: anywhere). 0, or -1 with errno. */
static inline int pin_to_cpu(int cpu)
{
	cpu_set_t set;

	if (cpu < 0)
		return 0;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return sched_setaffinity(0, sizeof(set), &set);
}

#endif
