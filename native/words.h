/* words.h: single stores of words that another process reads while they
 * are written (a capture's lease, a ring's tail). Python's struct.pack_into
 * clears the bytes first and then writes them, so a reader could see 0. */
#ifndef SBP_WORDS_H
#define SBP_WORDS_H
#include <stdint.h>

static inline void sbp_store_u64(void *p, uint64_t v)
{
	__atomic_store_n((uint64_t *)p, v, __ATOMIC_RELEASE);
}

static inline void sbp_store_u32(void *p, uint32_t v)
{
	__atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE);
}
#endif
