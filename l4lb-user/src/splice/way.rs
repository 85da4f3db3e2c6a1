//! The two directions of a spliced session, and values kept per direction.

use std::ops::{Index, IndexMut};

/// A direction of a session, named as the copy path's counters are: `Up` carries the
/// client's bytes to the backend, `Down` the backend's back. A direction is read from
/// its source socket (`socks[way]`) and written to its peer (`socks[way.reverse()]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    Up,
    Down,
}

impl Way {
    pub const BOTH: [Way; 2] = [Way::Up, Way::Down];

    /// The other direction: its source is this one's peer.
    pub fn reverse(self) -> Way {
        match self {
            Way::Up => Way::Down,
            Way::Down => Way::Up,
        }
    }
}

/// One value per direction (or per socket: the source of that direction).
#[derive(Debug, Default, Clone, Copy)]
pub struct PerWay<T>([T; 2]);

impl<T> PerWay<T> {
    pub fn new(up: T, down: T) -> PerWay<T> {
        PerWay([up, down])
    }

    pub fn iter(&self) -> impl Iterator<Item = (Way, &T)> {
        Way::BOTH.into_iter().zip(&self.0)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter()
    }

    pub fn into_ways(self) -> impl Iterator<Item = (Way, T)> {
        Way::BOTH.into_iter().zip(self.0)
    }

    /// Both values, to use at once.
    pub fn pair_mut(&mut self) -> (&mut T, &mut T) {
        let [up, down] = &mut self.0;
        (up, down)
    }
}

impl<T> Index<Way> for PerWay<T> {
    type Output = T;

    fn index(&self, way: Way) -> &T {
        let [up, down] = &self.0;
        match way {
            Way::Up => up,
            Way::Down => down,
        }
    }
}

impl<T> IndexMut<Way> for PerWay<T> {
    fn index_mut(&mut self, way: Way) -> &mut T {
        let [up, down] = &mut self.0;
        match way {
            Way::Up => up,
            Way::Down => down,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_way_has_its_own_value_and_reverse_swaps() {
        let mut v = PerWay::new("client", "backend");
        assert_eq!(v[Way::Up], "client");
        assert_eq!(v[Way::Up.reverse()], "backend");
        v[Way::Down] = "server";
        let all: Vec<_> = v.iter().collect();
        assert_eq!(all, [(Way::Up, &"client"), (Way::Down, &"server")]);
        assert_eq!(Way::Down.reverse().reverse(), Way::Down);
    }
}
