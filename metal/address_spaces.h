// Metal's address spaces as C++ types, for mlx_zeta.kernels.address_spaces (included by
// emulator.h; used only by the compile-only address-space check, never by a program that runs).
#pragma once

#include <compare>
#include <cstddef>
#include <type_traits>

// mlx_zeta.kernels.address_spaces rewrites `device T*`, `constant T*`, `threadgroup T*`, `thread T*`
// and `threadgroup T name[N]...` of a Metal body into these types and compiles the result with
// -fsyntax-only: pointers of different address spaces do not convert into each other, as in Metal.
// The program that runs keeps the verbatim text (address spaces erased by macros).
namespace emu {
struct device_space {};
struct constant_space {};
struct threadgroup_space {};
struct thread_space {};
template <typename T, int N, int... M>
struct tg_array;
template <typename I>
inline constexpr bool is_index_v = std::is_integral_v<I> || std::is_enum_v<I>;

template <typename S, typename T>
struct space_ptr {
  T* p = nullptr;
  space_ptr() = default;
  space_ptr(std::nullptr_t) {}
  space_ptr(T* raw) : p(raw) {}  // an address taken with & (its space unknown here): unchecked
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  space_ptr(space_ptr<S, U> o) : p(o.p) {}
  template <typename I, typename = std::enable_if_t<is_index_v<I>>>
  T& operator[](I i) const { return p[i]; }
  T& operator*() const { return *p; }
  T* operator->() const { return p; }
  template <typename I, typename = std::enable_if_t<is_index_v<I>>>
  space_ptr operator+(I i) const { return {p + i, 0}; }
  template <typename I, typename = std::enable_if_t<is_index_v<I>>>
  friend space_ptr operator+(I i, space_ptr a) { return a + i; }
  template <typename I, typename = std::enable_if_t<is_index_v<I>>>
  space_ptr operator-(I i) const { return {p - i, 0}; }
  std::ptrdiff_t operator-(space_ptr o) const { return p - o.p; }
  template <typename I> space_ptr& operator+=(I i) { p += i; return *this; }
  template <typename I> space_ptr& operator-=(I i) { p -= i; return *this; }
  space_ptr& operator++() { ++p; return *this; }
  space_ptr& operator--() { --p; return *this; }
  space_ptr operator++(int) { space_ptr o = *this; ++p; return o; }
  space_ptr operator--(int) { space_ptr o = *this; --p; return o; }
  bool operator==(const space_ptr& o) const { return p == o.p; }
  auto operator<=>(const space_ptr& o) const { return p <=> o.p; }
  explicit operator bool() const { return p != nullptr; }

 private:
  space_ptr(T* q, int) : p(q) {}
  template <typename, typename> friend struct space_ptr;
  template <typename, int, int...> friend struct tg_array;
};

template <typename T, int N, int... M>
struct tg_array {
  tg_array<T, M...> rows[N];
  template <typename I> tg_array<T, M...>& operator[](I i) { return rows[i]; }
};
template <typename T, int N>
struct tg_array<T, N> {
  T data[N];
  template <typename I, typename = std::enable_if_t<is_index_v<I>>>
  T& operator[](I i) { return data[i]; }
  operator space_ptr<threadgroup_space, T>() { return {data, 0}; }
  operator space_ptr<threadgroup_space, const T>() { return {data, 0}; }
};
}  // namespace emu
