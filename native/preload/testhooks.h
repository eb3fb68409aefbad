/* SPDX-License-Identifier: GPL-2.0 */
/* testhooks.h: hooks for the tests, compiled only into the test build
 * (libshmbypass-preload-test.so, -DSBP_TEST); nothing in the shipped one. */
#ifndef SBP_PRELOAD_TESTHOOKS_H
#define SBP_PRELOAD_TESTHOOKS_H

#ifdef SBP_TEST
/* Sleep SHMBYPASS_TEST_ARM_DELAY_NS between a waiter's last look at the
 * rings and arming them (tests/test_apps_shm.py). */
void test_arm_delay(void);
#else
static inline void test_arm_delay(void)
{
}
#endif

#endif
