-- Each service owns its database; nothing shares one.
CREATE DATABASE payment;
CREATE DATABASE barista;
