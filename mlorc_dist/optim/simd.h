// 64 bytes of T as one GCC vector: the compiler lowers it to the widest vectors the CPU has
// (-march=native). Shared by the fused step's CPU kernels (skinny.cpp, blocks.cpp).
#pragma once

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int size = 64 / sizeof(T);
  static inline type load(const T* p) { type v; __builtin_memcpy(&v, p, 64); return v; }
  static inline void store(T* p, const type& v) { __builtin_memcpy(p, &v, 64); }
  // the sum of the lanes: halves added as vectors twice, then 16 bytes of lanes one by one (a
  // chain of 16 dependent adds cost as much as a 256-element row's products in skinny.cpp)
  static inline T sum(const type& v) {
    typedef T half __attribute__((vector_size(32)));
    typedef T quarter __attribute__((vector_size(16)));
    half lo, hi;
    __builtin_memcpy(&lo, &v, 32);
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
    const half h = lo + hi;
    quarter ql, qh;
    __builtin_memcpy(&ql, &h, 16);
    __builtin_memcpy(&qh, reinterpret_cast<const char*>(&h) + 16, 16);
    const quarter q = ql + qh;
    T total = 0;
    for (int l = 0; l < int(16 / sizeof(T)); ++l) total += q[l];
    return total;
  }
};
