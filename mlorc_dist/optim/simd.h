// 64 bytes of T as one GCC vector: the compiler lowers it to the widest vectors the CPU has
// (-march=native). Shared by the fused step's CPU kernels (skinny.cpp, blocks.cpp).
#pragma once

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int size = 64 / sizeof(T);
  static inline type load(const T* p) { type v; __builtin_memcpy(&v, p, 64); return v; }
  static inline void store(T* p, const type& v) { __builtin_memcpy(p, &v, 64); }
  static inline T sum(const type& v) {
    T total = 0;
    for (int l = 0; l < size; ++l) total += v[l];
    return total;
  }
};
